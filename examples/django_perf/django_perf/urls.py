from django.urls import include, path
from perf import views
from rest_framework.routers import DefaultRouter

router = DefaultRouter()
router.register("signatures", views.SignatureViewSet, basename="signature")
router.register("datapoints", views.DataPointViewSet, basename="datapoint")
router.register("alertsummaries", views.AlertSummaryViewSet, basename="alertsummary")
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("tags", views.TagViewSet, basename="tag")

urlpatterns = [
    path("api/", include(router.urls)),
    path("api/summary/", views.SummaryView.as_view(), name="summary"),
    path("api/signature-count/", views.signature_count, name="signature-count"),
    path("api/tag-touch/", views.tag_touch, name="tag-touch"),
]

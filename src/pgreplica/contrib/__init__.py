"""Integrations with frameworks. Each subpackage imports the core and its framework,
never another integration."""

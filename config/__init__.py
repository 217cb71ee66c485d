"""Typed settings shared by every Loopwise command."""

from loopwise.config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]

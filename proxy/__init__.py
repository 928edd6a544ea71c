"""registry-proxy: a pull-through caching mirror for OCI and Docker registries."""

__version__ = "0.1.0"

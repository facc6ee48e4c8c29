"""Runnable YAML configs, shipped inside the package as ``zoo.configs`` (see ``zoo.registry``)."""

"""Hosts over SSH: inventory, install, rolling upgrade, system units."""

"""The gateway: a reverse proxy in a process of its own (`gpuprovider gateway`) that
makes services reachable by name, and the nginx configuration for production."""

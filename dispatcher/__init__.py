"""The dispatcher: data-plane reverse proxy, health checks, leadership and the ops API."""

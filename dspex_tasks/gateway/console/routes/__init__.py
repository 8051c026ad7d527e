"""The console's routers, one per page (and its actions and fragments)."""

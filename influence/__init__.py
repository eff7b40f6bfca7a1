"""quadsel influence package."""

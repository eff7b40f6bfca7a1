"""quadsel selection package."""

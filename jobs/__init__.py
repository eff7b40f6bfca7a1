"""quadsel jobs package."""

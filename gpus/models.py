"""GPU inventory and reservations: built by the scheduler issue (#3)."""

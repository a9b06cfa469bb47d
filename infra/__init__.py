"""Infrastructure the algorithm scripts run on, which a reader following one method need not open."""

"""`nectar report`: a markdown page with figures about one run directory."""

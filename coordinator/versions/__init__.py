"""Router versions: assembly on Ray, its scheduler, diff, promotion and the history table."""

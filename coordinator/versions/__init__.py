"""Router versions: assembly on Ray, the assembler thread, checks to live, diff, promotion,
pruning and the history table."""

"""What is measured about a router version: evaluation on public tasks, expert usage."""

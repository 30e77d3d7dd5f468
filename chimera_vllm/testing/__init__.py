"""Small targets and drafts built on the spot, for tests and examples that must run offline."""

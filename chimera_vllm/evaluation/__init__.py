"""The paper's metrics for a draft (acceptance, head accuracy, tree choice) and output comparison."""

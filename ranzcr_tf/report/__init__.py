"""Reports on finished runs: cross-validation scores and submission scores."""

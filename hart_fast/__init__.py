"""hart_fast: fast, faithful HART text-to-image inference."""

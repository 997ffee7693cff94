"""Commands that belong to no single stage of the pipeline (validate, schema)."""

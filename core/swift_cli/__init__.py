"""The ms-swift boundary as plain Python: argument specs and argv building, the launch environment,
output parsing, failure explanations and memory estimates. Named so as not to shadow ms-swift's own
``swift`` package."""

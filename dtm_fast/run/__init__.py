"""`dtm run`: the whole DTM experiment from one YAML file, each stage skipped when current."""

"""Lightning lives here: data modules, LightningModules, callbacks and the results record."""

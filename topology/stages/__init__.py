"""One module per worker stage: the stage class around its logic in agents/, its SPEC and its wire(Wiring)."""

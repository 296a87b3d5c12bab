"""Lightning DataModules for the toy and real data sets (imported as irnet.datamodules)."""

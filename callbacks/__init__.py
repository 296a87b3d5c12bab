"""Lightning callbacks for monitoring implicit networks (imported as irnet.callbacks)."""

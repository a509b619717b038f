class ExportError(ValueError):
    """A model or request this exporter cannot handle; the message says what
    is unsupported, why, and what to do instead."""

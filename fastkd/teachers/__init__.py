"""Teachers: the frozen model (online) or its cached outputs, behind one protocol."""

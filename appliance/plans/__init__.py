"""DR plans: the document, its validation and versions, test runs and cutover."""

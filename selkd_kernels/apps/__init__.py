"""Applications built on the package: the model zoo and the ``selkd demo`` job."""

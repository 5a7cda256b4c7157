"""The built-in suites: one module per suite (its pool builder and bench methods, registered on
import) beside its YAML definition (``<suite>.yaml``). The runner imports every module here."""

"""Communication methods: one module per method, one interface (`base.Method`), one registry.

Importing this package imports no method module: `registry.LAZY` names each one's module, imported
when a config first names the method, so listing the methods stays instant (tests/test_methods.py
imports every module and checks the table against what they register)."""

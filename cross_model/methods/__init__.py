"""Communication methods: one module per method, one interface (`base.Method`), one registry."""

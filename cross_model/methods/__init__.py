"""Communication methods: one module per method, one interface (`base.Method`), one registry.

Importing this package imports every method module, so the registry is complete before anyone reads
it; a missing module is an ImportError, never a method that silently is not there."""

from cross_model.methods import (  # noqa: F401
    ac,
    baseline,
    c2c,
    cipher,
    facts_only,
    kv_translate,
    kvcomm,
    latentwire,
    linear_probe,
    nld,
    qkvcomm,
    skyline,
)

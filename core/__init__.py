"""salt.core: contracts every layer may use (atomic outputs, platform choice)."""

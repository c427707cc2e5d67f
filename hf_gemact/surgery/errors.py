"""The errors surgery raises: each message says what is wrong and what to do."""


class SurgeryError(ValueError):
    """A patch request that cannot be carried out (the message says why and what to do)."""


class NoActivationError(SurgeryError):
    """The model has no recognisable (ACT2FN / hf_gemact) activation where one was asked for."""


class LayerSelectionError(SurgeryError, IndexError):
    """`layers` names a block that does not exist, or selects nothing."""


class ConfigRecordError(SurgeryError):
    """An entry of a config's hf_gemact_activations / hf_gemact_blend that cannot be applied (the
    message names the entry and the config file)."""

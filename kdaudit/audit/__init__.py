"""Run the attack suite over a set of models and gather tidy tables.

Per model, `audit_model` makes one forward pass over members and non-members
(`attacks.scoring.token_stats`), the extra passes its signals declare, and its generations;
`assemble` turns every model's audit into the signals, metrics and memorization tables, as
pure functions. `kdaudit.audit_models` and a run's stages both go through these two functions.
"""
from kdaudit.audit.context import AuditContext, AuditSet, ModelAudit, ModelInfo
from kdaudit.audit.model import audit_model, external_pass, plain, reference_models, \
    reference_pass
from kdaudit.audit.passes import ModelPass, compute_extraction, compute_generations, \
    compute_pass, extra_passes, hidden_secrets
from kdaudit.audit.results import AuditResult, assemble

__all__ = ["AuditContext", "AuditResult", "AuditSet", "ModelAudit", "ModelInfo", "ModelPass",
           "assemble", "audit_model", "compute_extraction", "compute_generations",
           "compute_pass", "external_pass", "extra_passes", "hidden_secrets", "plain",
           "reference_models", "reference_pass"]

"""The release gate and both release paths.

    load_policy(path=None) -> Policy          (default: the shipped toy-scale policy)
    run_gate(model_dir, policy, out_dir, baseline=None, variables={}, log=...) -> decision record
    approve(record, by) / publish(record, out=...)   sign-off, then the open bundle or the closed registry
    verify_log(log) -> LogHead                 the audit log's hash chain, checked end to end
"""

from behemoth.release.audit import AuditError, verify_log
from behemoth.release.gate import GateError, decide, load_record, run_gate
from behemoth.release.policy import Policy, PolicyError, default_policy_path, load_policy
from behemoth.release.publish import ReleaseError, approve, publish, verify_manifest
from behemoth.release.registry import RegistryError, registered_models

__all__ = ["load_policy", "default_policy_path", "Policy", "PolicyError", "run_gate", "decide", "load_record",
           "GateError", "approve", "publish", "verify_manifest", "ReleaseError", "verify_log", "AuditError",
           "registered_models", "RegistryError"]

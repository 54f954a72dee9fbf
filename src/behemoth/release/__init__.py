"""The release gate (load_policy, run_gate), sign-off and both release paths (approve, then publish:
an open bundle or the closed registry), and the audit log's hash chain (verify_log)."""

from behemoth.release.audit import AuditError, verify_log
from behemoth.release.gate import GateError, decide, load_record, run_gate
from behemoth.release.policy import Policy, PolicyError, default_policy_path, load_policy
from behemoth.release.publish import ReleaseError, approve, publish, verify_manifest
from behemoth.release.registry import RegistryError, registered_models

__all__ = ["load_policy", "default_policy_path", "Policy", "PolicyError", "run_gate", "decide", "load_record",
           "GateError", "approve", "publish", "verify_manifest", "ReleaseError", "verify_log", "AuditError",
           "registered_models", "RegistryError"]

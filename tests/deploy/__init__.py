"""The deployment files (Kubernetes manifests, alert rules, the dashboard), checked
with the tools their users run: kubernetes-validate, promtool, a PromQL parser."""

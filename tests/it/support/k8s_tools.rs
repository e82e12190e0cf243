//! Installs and locates the Kubernetes tool chain the chart tests need (helm, kubernetes-validate, hadolint).

//! Helm chart, plain manifests and Dockerfile checks (rendered with helm, validated offline).

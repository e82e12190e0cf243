{{/* Names, labels, images and the issuer the injector names. */}}

{{- define "wsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: <release>-wsgate, or <release> when it already says wsgate. */}}
{{- define "wsgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "wsgate.labels" -}}
helm.sh/chart: {{ include "wsgate.chart" . }}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wsgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of the injector's objects (Deployment, pods, Service, PDB). */}}
{{- define "wsgate.injector.labels" -}}
{{ include "wsgate.labels" . }}
app.kubernetes.io/component: injector
{{- end -}}

{{/* What selects the injector pods. */}}
{{- define "wsgate.injector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{/* The label that keeps the injector's own pods away from its webhook (objectSelector). */}}
{{- define "wsgate.injector.podMarker" -}}
wsgate.dev/component: injector
{{- end -}}

{{- define "wsgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wsgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest. Arguments: dict "image" (repository/tag/digest) "default" (tag). */}}
{{- define "wsgate.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.image" -}}
{{- include "wsgate.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "wsgate.sidecarImage" -}}
{{- if .Values.sidecar.image.repository -}}
{{- include "wsgate.imageRef" (dict "image" .Values.sidecar.image "default" (default .Chart.AppVersion .Values.image.tag)) -}}
{{- else -}}
{{- include "wsgate.image" . -}}
{{- end -}}
{{- end -}}

{{/* Does the chart create the workload CA and its ClusterIssuer? */}}
{{- define "wsgate.createsWorkloadIssuer" -}}
{{- if and .Values.certManager.enabled .Values.certManager.workloadIssuer.create -}}true{{- end -}}
{{- end -}}

{{/* The issuer of the workload certificates, as "name kind group" JSON (what --issuer-* say). */}}
{{- define "wsgate.workloadIssuerRef" -}}
{{- if include "wsgate.createsWorkloadIssuer" . -}}
{{- dict "name" .Values.certManager.workloadIssuer.name "kind" "ClusterIssuer" "group" "cert-manager.io" | toJson -}}
{{- else -}}
{{- $ref := .Values.certManager.issuerRef -}}
{{- if and .Values.injector.certificateController (not $ref.name) -}}
{{- fail "certManager.issuerRef.name is required: the chart does not create the workload issuer (certManager.enabled=false or certManager.workloadIssuer.create=false), so the certificate controller needs yours" -}}
{{- end -}}
{{- dict "name" $ref.name "kind" $ref.kind "group" $ref.group | toJson -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.webhookSecretName" -}}
{{- if .Values.certManager.enabled -}}
{{- printf "%s-webhook-tls" (include "wsgate.fullname" .) -}}
{{- else -}}
{{- required "webhook.tls.existingSecret is required when certManager.enabled=false" .Values.webhook.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The hardened container securityContext shared by every container of the chart. */}}
{{- define "wsgate.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The namespaces the webhooks never see, as a JSON list: kube-system, the release namespace
     (the injector's own), cert-manager's (it issues the injector's serving certificate, so it
     must never wait for the injector) and webhook.excludeNamespaces. */}}
{{- define "wsgate.excludedNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace .Values.certManager.namespace) .Values.webhook.excludeNamespaces | uniq | toJson -}}
{{- end -}}

{{/* What selects the chart's `helm test` pod (the NetworkPolicy lets it reach the webhook). */}}
{{- define "wsgate.helmTest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end -}}

{{/*
Seconds in a duration written as the schema allows (`24h`, `1h30m`, `90s`: whole h, m and s parts).
*/}}
{{- define "wsgate.seconds" -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+[hms]" . -1 -}}
{{- $n := atoi (regexFind "[0-9]+" .) -}}
{{- if hasSuffix "h" . -}}{{- $total = add $total (mul $n 3600) -}}
{{- else if hasSuffix "m" . -}}{{- $total = add $total (mul $n 60) -}}
{{- else -}}{{- $total = add $total $n -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}

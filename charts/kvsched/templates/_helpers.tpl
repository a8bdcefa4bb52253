{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "kvsched.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the objects this release makes for the endpoint picker. */}}
{{- define "kvsched.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvsched.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "true" when the replicas share their in-flight load: sync.enabled, else replicas > 1. */}}
{{- define "kvsched.syncEnabled" -}}
{{- $sync := .Values.inferenceExtension.sync }}
{{- if kindIs "bool" $sync.enabled }}
{{- $sync.enabled }}
{{- else }}
{{- gt (int .Values.inferenceExtension.replicas) 1 }}
{{- end }}
{{- end }}

{{- define "kvsched.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvsched.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvsched.labels" -}}
helm.sh/chart: {{ include "kvsched.chart" . }}
{{ include "kvsched.selectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvsched.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvsched.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvsched.image" -}}
{{- $image := .Values.inferenceExtension.image }}
{{- $ref := printf "%s/%s" $image.hub $image.name }}
{{- if $image.digest }}
{{- printf "%s@%s" $ref $image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The InferencePool kvsched serves: the GIE chart names it after the release. */}}
{{- define "kvsched.poolName" -}}
{{- default .Release.Name .Values.inferencePool.name }}
{{- end }}

{{- define "kvsched.poolGroup" -}}
{{- index (splitList "/" .Values.inferencePool.apiVersion) 0 }}
{{- end }}

{{/* "true" when this release creates the InferencePool; unset create follows matchLabels. */}}
{{- define "kvsched.createPool" -}}
{{- $create := .Values.inferencePool.create }}
{{- if kindIs "invalid" $create }}
{{- if .Values.inferencePool.modelServers.matchLabels }}true{{ end }}
{{- else if $create }}true
{{- end }}
{{- end }}

{{/* Ports of the pool's model servers: the older single targetPortNumber wins when set. */}}
{{- define "kvsched.targetPorts" -}}
{{- if not (kindIs "invalid" .Values.inferencePool.targetPortNumber) }}
- number: {{ int .Values.inferencePool.targetPortNumber }}
{{- else }}
{{- range .Values.inferencePool.targetPorts }}
- number: {{ int .number }}
{{- end }}
{{- end }}
{{- end }}

{{/* config.yaml's tls.mode, in the spelling of the kvsched config file. */}}
{{- define "kvsched.tlsMode" -}}
{{- $mode := .Values.inferenceExtension.tls.mode }}
{{- if eq $mode "secret" }}files
{{- else if eq $mode "plaintext" }}plaintext
{{- else }}self_signed
{{- end }}
{{- end }}

{{/* GIE's verbosity flag `v` (4 = debug in the GIE EPP) maps onto kvsched's --log-level. */}}
{{- define "kvsched.logLevel" -}}
{{- $flags := .Values.inferenceExtension.flags | default dict }}
{{- if hasKey $flags "v" }}
{{- if ge (int (index $flags "v")) 4 }}DEBUG{{ else }}INFO{{ end }}
{{- else }}
{{- .Values.inferenceExtension.logLevel }}
{{- end }}
{{- end }}

{{- define "ragline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ragline.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ragline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ragline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: include "ragline.selector" (list . "gateway") */}}
{{- define "ragline.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "ragline.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ragline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ragline.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ragline.vllmName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-vllm-%s" (include "ragline.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ragline.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "ragline.fullname" .) -}}
{{- else -}}
{{- required "redis.enabled is false: set redis.url (limits, run-time keys and the cache need a Redis every gateway shares)" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "ragline.keysSecret" -}}
{{- default (printf "%s-keys" (include "ragline.fullname" .)) .Values.existingKeysSecret -}}
{{- end -}}

{{- define "ragline.databaseSecret" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if or .Values.postgresql.enabled .Values.database.url -}}
{{- printf "%s-database" (include "ragline.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "ragline.postgresSecret" -}}
{{- default (printf "%s-postgresql" (include "ragline.fullname" .)) .Values.postgresql.auth.existingSecret -}}
{{- end -}}

{{/* the pod security context every component runs with */}}
{{- define "ragline.podSecurity" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ragline.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

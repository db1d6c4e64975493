{{/* Named after the release so that the parent chart can derive redis://<release>-redis:6379/0. */}}
{{- define "redis-server.name" -}}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "redis-server.selectorLabels" -}}
app.kubernetes.io/name: redis-server
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "redis-server.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "redis-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: driftserve
{{- end }}

{{- define "redis-server.secretName" -}}
{{- default (include "redis-server.name" .) .Values.auth.existingSecret }}
{{- end }}

{{/* Restricted Pod Security Standard. */}}
{{- define "redis-server.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "redis-server.passwordEnv" -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "redis-server.secretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}

{{/* Named after the release so that the parent chart can derive the bootstrap address
     (<release>-kafka-kafka-bootstrap:9092). */}}
{{- define "kafka-cluster.name" -}}
{{- printf "%s-kafka" .Release.Name | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: kafka-cluster
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: driftserve
{{- end }}

{{/* Restricted Pod Security Standard; Strimzi images run as a non-root numeric user. */}}
{{- define "kafka-cluster.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kafka-cluster.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Replication factor of internal and driftserve topics: 3, or fewer on a smaller cluster. */}}
{{- define "kafka-cluster.replicationFactor" -}}
{{- min 3 (int64 .Values.replicas) }}
{{- end }}

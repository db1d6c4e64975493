{{/*
Names and labels.
*/}}
{{- define "driftserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "driftserve.fullname" -}}
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

{{/*
KubeRay appends a 6-character suffix to the RayService name for its RayCluster and then "-serve-svc"
and similar suffixes, so it rejects RayService names longer than 47 characters.
*/}}
{{- define "driftserve.rayServiceName" -}}
{{- include "driftserve.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "driftserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "driftserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "driftserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "driftserve.labels" -}}
helm.sh/chart: {{ include "driftserve.chart" . }}
{{ include "driftserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: driftserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component; call with (dict "ctx" $ "component" "learner"). */}}
{{- define "driftserve.componentLabels" -}}
{{ include "driftserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "driftserve.componentSelectorLabels" -}}
{{ include "driftserve.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "driftserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "driftserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "driftserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "driftserve.pvcName" -}}
{{- default (printf "%s-state" (include "driftserve.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Kafka and Redis endpoints: the in-cluster subcharts when enabled, otherwise the external ones from values.
The subcharts name their resources after the release (see their templates/_helpers.tpl).
*/}}
{{- define "driftserve.kafkaClusterName" -}}
{{- printf "%s-kafka" .Release.Name | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "driftserve.redisServerName" -}}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "driftserve.kafkaBootstrap" -}}
{{- if .Values.kafkaCluster.enabled }}
{{- printf "%s-kafka-bootstrap:%s" (include "driftserve.kafkaClusterName" .) (ternary "9093" "9092" (include "driftserve.inClusterKafkaTls" . | eq "true")) }}
{{- else }}
{{- required "kafka.bootstrapServers is required unless kafkaCluster.enabled (in-cluster Kafka) is true" .Values.kafka.bootstrapServers }}
{{- end }}
{{- end }}

{{- define "driftserve.redisUrl" -}}
{{- if .Values.redisServer.enabled }}
{{- printf "redis://%s:6379/0" (include "driftserve.redisServerName" .) }}
{{- else }}
{{- required "redis.url is required unless redisServer.enabled (in-cluster Redis) is true" .Values.redis.url }}
{{- end }}
{{- end }}

{{/* The Secret holding the Redis password as "name/key", or "" when Redis needs no password. */}}
{{- define "driftserve.redisPasswordSecret" -}}
{{- if .Values.redisServer.enabled }}
{{- $auth := default dict .Values.redisServer.auth }}
{{- printf "%s/%s" (default (include "driftserve.redisServerName" .) $auth.existingSecret) (default "password" $auth.secretKey) }}
{{- else if .Values.redis.passwordSecret.name }}
{{- printf "%s/%s" .Values.redis.passwordSecret.name .Values.redis.passwordSecret.key }}
{{- end }}
{{- end }}

{{- define "driftserve.inClusterKafkaTls" -}}
{{- if hasKey .Values.kafkaCluster "tls" }}{{ .Values.kafkaCluster.tls }}{{ else }}true{{ end }}
{{- end }}

{{- define "driftserve.kafkaSecurityProtocol" -}}
{{- if .Values.kafkaCluster.enabled }}
{{- ternary "SSL" "PLAINTEXT" (include "driftserve.inClusterKafkaTls" . | eq "true") }}
{{- else }}
{{- .Values.kafka.securityProtocol }}
{{- end }}
{{- end }}

{{/*
Secrets mounted as files under /etc/driftserve/tls/<name>/ (CA bundles, client certificates), as a YAML
list of {name, secret, keys}. The settings point at the files (kafka_ssl_*, redis_ssl_ca_certs).
*/}}
{{- define "driftserve.tlsSecrets" -}}
{{- $out := list }}
{{- if .Values.kafkaCluster.enabled }}
{{- if eq (include "driftserve.inClusterKafkaTls" .) "true" }}
{{- /* Strimzi publishes its cluster CA certificate in <cluster>-cluster-ca-cert, key ca.crt. */}}
{{- $out = append $out (dict "name" "kafka-ca" "secret" (printf "%s-cluster-ca-cert" (include "driftserve.kafkaClusterName" .)) "keys" (list "ca.crt")) }}
{{- end }}
{{- else }}
{{- with .Values.kafka.tls.caSecret }}{{ if .name }}
{{- $out = append $out (dict "name" "kafka-ca" "secret" .name "keys" (list .key)) }}
{{- end }}{{ end }}
{{- with .Values.kafka.tls.clientCertSecret }}{{ if .name }}
{{- $out = append $out (dict "name" "kafka-client" "secret" .name "keys" (list .certKey .keyKey)) }}
{{- end }}{{ end }}
{{- end }}
{{- if and (not .Values.redisServer.enabled) .Values.redis.tls.caSecret.name }}
{{- $out = append $out (dict "name" "redis-ca" "secret" .Values.redis.tls.caSecret.name "keys" (list .Values.redis.tls.caSecret.key)) }}
{{- end }}
{{- toYaml (dict "items" $out) }}
{{- end }}

{{- define "driftserve.tlsVolumes" -}}
{{- range (include "driftserve.tlsSecrets" . | fromYaml).items }}
- name: tls-{{ .name }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      {{- range .keys }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}

{{- define "driftserve.tlsVolumeMounts" -}}
{{- range (include "driftserve.tlsSecrets" . | fromYaml).items }}
- name: tls-{{ .name }}
  mountPath: /etc/driftserve/tls/{{ .name }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
driftserve settings for one process role ("serving", "learner" or "memory-writer"), as a YAML map from
Settings field name to string value. Each process gets the fields it uses; the env var of field foo_bar
is DRIFTSERVE_FOO_BAR. Numbers go through int64/float64 because Helm reads every YAML number as a
float64 and would print 1000000 as 1e+06. Secrets are not here: see driftserve.secretEnv.
*/}}
{{- define "driftserve.settings" -}}
{{- $v := .ctx.Values }}
{{- $s := dict
  "log_level" $v.logLevel
  "kafka_bootstrap" (include "driftserve.kafkaBootstrap" .ctx)
  "feedback_topic" $v.kafka.topics.feedback
  "dlq_topic" $v.kafka.topics.dlq
  "rollout_topic" $v.kafka.topics.rollout
  "forget_topic" $v.kafka.topics.forget
  "kafka_security_protocol" (include "driftserve.kafkaSecurityProtocol" .ctx)
  "feedback_partitions" (int64 $v.kafka.feedbackPartitions | toString)
  "consumer_group_prefix" $v.kafka.consumerGroupPrefix
  "kafka_session_timeout_ms" (int64 $v.kafka.sessionTimeoutMs | toString)
  "kafka_heartbeat_interval_ms" (int64 $v.kafka.heartbeatIntervalMs | toString)
  "redis_url" (include "driftserve.redisUrl" .ctx)
  "redis_namespace" $v.redis.namespace
  "request_embedding_ttl_s" (int64 $v.redis.requestEmbeddingTtlS | toString)
  "state_dir" "/var/lib/driftserve"
  "max_length" (int64 $v.model.maxLength | toString)
  "compensation_enabled" (toString $v.compensation.enabled)
  "compensation_k" (int64 $v.compensation.k | toString)
  "compensation_tau" (float64 $v.compensation.tau | toString)
  "compensation_lambda_max" (float64 $v.compensation.lambdaMax | toString)
  "compensation_sim_low" (float64 $v.compensation.simLow | toString)
  "compensation_sim_high" (float64 $v.compensation.simHigh | toString)
  "learner_enabled" (toString $v.learner.enabled)
  "rollout_enabled" (toString $v.rollout.enabled)
}}
{{- if not $v.kafkaCluster.enabled }}
{{- with $v.kafka.sasl.mechanism }}{{ $_ := set $s "kafka_sasl_mechanism" . }}{{ end }}
{{- with $v.kafka.sasl.username }}{{ $_ := set $s "kafka_sasl_username" . }}{{ end }}
{{- end }}
{{- range (include "driftserve.tlsSecrets" .ctx | fromYaml).items }}
{{- $dir := printf "/etc/driftserve/tls/%s" .name }}
{{- if eq .name "kafka-ca" }}{{ $_ := set $s "kafka_ssl_cafile" (printf "%s/%s" $dir (index .keys 0)) }}{{ end }}
{{- if eq .name "kafka-client" }}
{{- $_ := set $s "kafka_ssl_certfile" (printf "%s/%s" $dir (index .keys 0)) }}
{{- $_ := set $s "kafka_ssl_keyfile" (printf "%s/%s" $dir (index .keys 1)) }}
{{- end }}
{{- if eq .name "redis-ca" }}{{ $_ := set $s "redis_ssl_ca_certs" (printf "%s/%s" $dir (index .keys 0)) }}{{ end }}
{{- end }}
{{- if $v.model.existingClaim }}
{{- $_ := set $s "model_path" (printf "/models/%s" (required "model.path is required with model.existingClaim" $v.model.path | trimPrefix "/")) }}
{{- end }}
{{- if eq .role "serving" }}
{{- $_ := set $s "device" (ternary "cuda" "cpu" $v.serving.gpu.enabled) }}
{{- $_ := set $s "http_host" "0.0.0.0" }}
{{- $_ := set $s "http_port" (int64 $v.serving.port | toString) }}
{{- $_ := set $s "max_body_bytes" (int64 $v.serving.maxBodyBytes | toString) }}
{{- $_ := set $s "max_batch_texts" (int64 $v.serving.maxBatchTexts | toString) }}
{{- $_ := set $s "num_replicas" (int64 $v.serving.replicas | toString) }}
{{- $_ := set $s "replica_num_cpus" (float64 $v.serving.replicaResources.numCpus | toString) }}
{{- $_ := set $s "replica_num_gpus" (include "driftserve.replicaNumGpus" .ctx) }}
{{- $_ := set $s "sync_interval_s" (float64 $v.serving.syncIntervalS | toString) }}
{{- $_ := set $s "batch_max_size" (int64 $v.serving.batching.maxBatchSize | toString) }}
{{- $_ := set $s "batch_wait_timeout_s" (float64 $v.serving.batching.batchWaitTimeoutS | toString) }}
{{- $_ := set $s "adapter_cache_size" (int64 $v.serving.adapterCache.maxAdapters | toString) }}
{{- $_ := set $s "adapter_pinned_domains" (join "," $v.serving.adapterCache.pinned) }}
{{- $_ := set $s "memory_index" $v.serving.memoryIndex }}
{{- $_ := set $s "runtime" $v.serving.runtime }}
{{- else if eq .role "learner" }}
{{- $_ := set $s "device" (ternary "cuda" "cpu" $v.learner.gpu.enabled) }}
{{- $_ := set $s "learner_min_examples" (int64 $v.learner.minExamples | toString) }}
{{- $_ := set $s "learner_retrain_every" (int64 $v.learner.retrainEvery | toString) }}
{{- $_ := set $s "learner_epochs" (int64 $v.learner.epochs | toString) }}
{{- $_ := set $s "learner_continued_epochs" (int64 $v.learner.continuedEpochs | toString) }}
{{- $_ := set $s "learner_lora_layers" (int64 $v.learner.loraLayers | toString) }}
{{- $_ := set $s "learner_max_length" (int64 $v.learner.maxLength | toString) }}
{{- $_ := set $s "learner_max_steps" (int64 $v.learner.maxSteps | toString) }}
{{- $_ := set $s "learner_batch_size" (int64 $v.learner.batchSize | toString) }}
{{- $_ := set $s "learner_holdout_frac" (float64 $v.learner.holdoutFrac | toString) }}
{{- $_ := set $s "learner_max_rollout_wait_s" (float64 $v.learner.maxRolloutWaitS | toString) }}
{{- $_ := set $s "learner_guard" (toString $v.learner.guard) }}
{{- else if eq .role "rollout-controller" }}
{{- $_ := set $s "device" "cpu" }}
{{- $g := $v.rollout.gate }}
{{- $c := $v.rollout.canary }}
{{- $_ := set $s "gate_epsilon" (float64 $g.epsilon | toString) }}
{{- $_ := set $s "gate_max_nfr" (float64 $g.maxNfr | toString) }}
{{- $_ := set $s "gate_max_ece_increase" (float64 $g.maxEceIncrease | toString) }}
{{- $_ := set $s "gate_compat_epsilon" (float64 $g.compatEpsilon | toString) }}
{{- $_ := set $s "gate_min_holdout" (int64 $g.minHoldout | toString) }}
{{- $_ := set $s "gate_adapter_margin" (float64 $g.adapterMargin | toString) }}
{{- $_ := set $s "gate_first_min_gain" (float64 $g.firstMinGain | toString) }}
{{- $_ := set $s "gate_first_alpha" (float64 $g.firstAlpha | toString) }}
{{- $_ := set $s "gate_policy_overrides" (toJson ($g.overrides | default dict)) }}
{{- $_ := set $s "shadow_share" (float64 $v.rollout.shadow.share | toString) }}
{{- $_ := set $s "shadow_seconds" (float64 $v.rollout.shadow.seconds | toString) }}
{{- $_ := set $s "canary_weight" (float64 $c.weight | toString) }}
{{- $_ := set $s "canary_interval_s" (float64 $c.intervalS | toString) }}
{{- $_ := set $s "canary_passes" (int64 $c.passes | toString) }}
{{- $_ := set $s "canary_failure_threshold" (int64 $c.failureThreshold | toString) }}
{{- $_ := set $s "canary_min_requests" (int64 $c.minRequests | toString) }}
{{- $_ := set $s "canary_min_feedback" (int64 $c.minFeedback | toString) }}
{{- $_ := set $s "canary_max_error_rate" (float64 $c.maxErrorRate | toString) }}
{{- $_ := set $s "canary_max_p99_ms" (float64 $c.maxP99Ms | toString) }}
{{- $_ := set $s "canary_max_p99_ratio" (float64 $c.maxP99Ratio | toString) }}
{{- $_ := set $s "canary_max_nfr" (float64 $c.maxNfr | toString) }}
{{- $_ := set $s "canary_epsilon" (float64 $c.epsilon | toString) }}
{{- $_ := set $s "canary_alpha" (float64 $c.alpha | toString) }}
{{- else if eq .role "memory-writer" }}
{{- $_ := set $s "device" "cpu" }}
{{- else }}
{{- fail (printf "driftserve.settings: unknown role %q" .role) }}
{{- end }}
{{- toYaml $s }}
{{- end }}

{{- define "driftserve.replicaNumGpus" -}}
{{- if .Values.serving.gpu.enabled }}{{ float64 .Values.serving.gpu.perReplica | toString }}{{ else }}0{{ end }}
{{- end }}

{{/* Container env entries for the settings of a role: (dict "ctx" $ "role" "learner"). */}}
{{- define "driftserve.settingsEnv" -}}
{{- range $field, $value := include "driftserve.settings" . | fromYaml }}
- name: DRIFTSERVE_{{ upper $field }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Secret-backed settings: only ever secretKeyRef, never a literal. */}}
{{- define "driftserve.secretEnv" -}}
{{- with include "driftserve.redisPasswordSecret" . }}
{{- $ref := splitList "/" . }}
- name: DRIFTSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ index $ref 0 }}
      key: {{ index $ref 1 }}
{{- end }}
{{- with .Values.admin.tokenSecret.name }}
- name: DRIFTSERVE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.admin.tokenSecret.key }}
{{- end }}
{{- if and (not .Values.kafkaCluster.enabled) .Values.kafka.sasl.passwordSecret.name }}
- name: DRIFTSERVE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.passwordSecret.name }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
{{- end }}

{{/*
Process environment that is not a driftserve setting: the root filesystem is read-only, so HOME (caches
of Python libraries) points at the /tmp emptyDir; models are never downloaded at run time.
*/}}
{{- define "driftserve.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}

{{/* Restricted Pod Security Standard, pod level. */}}
{{- define "driftserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int64 .Values.podSecurity.runAsUser }}
runAsGroup: {{ int64 .Values.podSecurity.runAsGroup }}
fsGroup: {{ int64 .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Restricted Pod Security Standard, container level (KubeRay copies it to the init containers it injects). */}}
{{- define "driftserve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* nodeSelector/tolerations/affinity of a pod: (dict "ctx" $ "spec" .Values.learner "gpu" true). */}}
{{- define "driftserve.scheduling" -}}
{{- $nodeSelector := .spec.nodeSelector | default dict }}
{{- $tolerations := .spec.tolerations | default list }}
{{- if .gpu }}
{{- $nodeSelector = merge (deepCopy $nodeSelector) (.ctx.Values.gpu.nodeSelector | default dict) }}
{{- $tolerations = concat $tolerations (.ctx.Values.gpu.tolerations | default list) }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources of a container, adding `count` GPUs of gpu.resourceName to requests and limits. */}}
{{- define "driftserve.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .gpus }}
{{- $name := .ctx.Values.gpu.resourceName }}
{{- $_ := set $res "limits" (merge (dict $name (int64 .gpus | toString)) ($res.limits | default dict)) }}
{{- $_ := set $res "requests" (merge (dict $name (int64 .gpus | toString)) ($res.requests | default dict)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The shared state volume (state_dir) and the optional read-only model volume. */}}
{{- define "driftserve.stateVolume" -}}
- name: state
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "driftserve.pvcName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}

{{- define "driftserve.modelVolume" -}}
{{- if .Values.model.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "driftserve.modelVolumeMount" -}}
{{- if .Values.model.existingClaim }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- end }}

{{/* Checks that values.schema.json cannot express. */}}
{{- define "driftserve.validate" -}}
{{- if not (regexMatch "^[a-z]" (include "driftserve.rayServiceName" .)) }}
{{- fail "the release's full name must start with a lower-case letter (KubeRay requires a DNS-1035 RayService name); set fullnameOverride" }}
{{- end }}
{{- $k := .Values.kafka }}
{{- $sasl := or $k.sasl.mechanism $k.sasl.username $k.sasl.passwordSecret.name }}
{{- $tls := or $k.tls.caSecret.name $k.tls.clientCertSecret.name }}
{{- if .Values.kafkaCluster.enabled }}
{{- if or (ne $k.securityProtocol "PLAINTEXT") $sasl $tls }}
{{- fail "kafka.securityProtocol, kafka.sasl and kafka.tls configure an external Kafka; with kafkaCluster.enabled use kafkaCluster.tls" }}
{{- end }}
{{- else }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
{{- if not (and $k.sasl.mechanism $k.sasl.username $k.sasl.passwordSecret.name) }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.passwordSecret.name" $k.securityProtocol) }}
{{- end }}
{{- else if $sasl }}
{{- fail (printf "kafka.sasl is set but kafka.securityProtocol is %s; use SASL_PLAINTEXT or SASL_SSL" $k.securityProtocol) }}
{{- end }}
{{- if and $tls (not (hasSuffix "SSL" $k.securityProtocol)) }}
{{- fail (printf "kafka.tls is set but kafka.securityProtocol is %s; use SSL or SASL_SSL" $k.securityProtocol) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redisServer.enabled) .Values.redis.tls.caSecret.name (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tls.caSecret needs a rediss:// redis.url" }}
{{- end }}
{{- if .Values.serving.gpu.enabled }}
{{- $capacity := mulf (float64 .Values.serving.workers.replicas) (float64 .Values.serving.gpu.perWorker) }}
{{- $needed := mulf (float64 .Values.serving.replicas) (float64 .Values.serving.gpu.perReplica) }}
{{- if gt $needed $capacity }}
{{- fail (printf "serving needs %v GPUs (replicas x gpu.perReplica) but the workers have %v (workers.replicas x gpu.perWorker)" $needed $capacity) }}
{{- end }}
{{- end }}
{{- end }}

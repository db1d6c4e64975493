{{/*
Pod spec of a Ray head or worker: (dict "ctx" $ "spec" .Values.serving.workers "gpus" 1 "head" false).
*/}}
{{- define "driftserve.rayPodSpec" -}}
{{- $ctx := .ctx -}}
serviceAccountName: {{ include "driftserve.serviceAccountName" $ctx }}
# Autoscaling is off, so Ray never calls the Kubernetes API.
automountServiceAccountToken: false
securityContext:
  {{- include "driftserve.podSecurityContext" $ctx | nindent 2 }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "driftserve.scheduling" (dict "ctx" $ctx "spec" .spec "gpu" (gt (int64 .gpus) 0)) }}
containers:
  # KubeRay requires the Ray container to come first.
  - name: {{ ternary "ray-head" "ray-worker" .head }}
    image: {{ include "driftserve.image" $ctx }}
    imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
    ports:
      {{- if .head }}
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      {{- end }}
      - name: serve
        containerPort: {{ int64 $ctx.Values.serving.port }}
      - name: metrics
        containerPort: 8080
    env:
      {{- with include "driftserve.secretEnv" $ctx | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- include "driftserve.runtimeEnv" $ctx | trim | nindent 6 }}
      - name: RAY_USAGE_STATS_ENABLED
        value: "0"
    resources:
      {{- include "driftserve.resources" (dict "ctx" $ctx "resources" .spec.resources "gpus" .gpus) | nindent 6 }}
    securityContext:
      {{- include "driftserve.containerSecurityContext" $ctx | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: dshm
        mountPath: /dev/shm
      {{- with include "driftserve.tlsVolumeMounts" $ctx | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- if not .head }}
      - name: state
        mountPath: /var/lib/driftserve
      {{- with include "driftserve.modelVolumeMount" $ctx | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- end }}
volumes:
  # Ray's session directory (/tmp/ray) and HOME live here; the root filesystem is read-only.
  - name: tmp
    emptyDir: {}
  # Ray's object store.
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $ctx.Values.ray.sharedMemorySize }}
  {{- with include "driftserve.tlsVolumes" $ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- if not .head }}
  {{- include "driftserve.stateVolume" $ctx | trim | nindent 2 }}
  {{- with include "driftserve.modelVolume" $ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- end }}
{{- end }}

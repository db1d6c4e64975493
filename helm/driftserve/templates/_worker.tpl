{{/*
A Deployment running one `driftserve <command>` process (learner, memory writer):
(dict "ctx" $ "component" "learner" "command" "learner" "spec" .Values.learner "replicas" 1 "gpus" 1
      "strategy" "Recreate" "state" true)
*/}}
{{- define "driftserve.processDeployment" -}}
{{- $ctx := .ctx -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ printf "%s-%s" (include "driftserve.fullname" $ctx) .component | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "driftserve.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
spec:
  replicas: {{ int64 .replicas }}
  strategy:
    type: {{ .strategy }}
  selector:
    matchLabels:
      {{- include "driftserve.componentSelectorLabels" (dict "ctx" $ctx "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "driftserve.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 8 }}
      {{- with $ctx.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "driftserve.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      # SIGTERM lets the consumer finish its batch and commit before exiting.
      terminationGracePeriodSeconds: 60
      securityContext:
        {{- include "driftserve.podSecurityContext" $ctx | nindent 8 }}
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "driftserve.scheduling" (dict "ctx" $ctx "spec" .spec "gpu" (gt (int64 .gpus) 0)) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "driftserve.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: [driftserve, {{ .command }}]
          env:
            {{- include "driftserve.settingsEnv" (dict "ctx" $ctx "role" .component) | trim | nindent 12 }}
            {{- with include "driftserve.secretEnv" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "driftserve.runtimeEnv" $ctx | trim | nindent 12 }}
          resources:
            {{- include "driftserve.resources" (dict "ctx" $ctx "resources" .spec.resources "gpus" .gpus) | nindent 12 }}
          securityContext:
            {{- include "driftserve.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: state
              mountPath: /var/lib/driftserve
            {{- with include "driftserve.tlsVolumeMounts" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with include "driftserve.modelVolumeMount" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- with include "driftserve.tlsVolumes" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if .state }}
        {{- include "driftserve.stateVolume" $ctx | trim | nindent 8 }}
        {{- else }}
        # This process keeps nothing across restarts; state_dir only holds its ready marker.
        - name: state
          emptyDir: {}
        {{- end }}
        {{- with include "driftserve.modelVolume" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end }}

package metering

// JitterMargin is jitterMargin, for the tests that check what pacing
// guarantees.
const JitterMargin = jitterMargin

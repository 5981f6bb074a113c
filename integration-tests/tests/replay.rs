//! `<connector> replay` end to end: each broker connector's real binary against its real
//! broker, a function rejecting then accepting (see `integration_tests::replay` for the
//! steps and what each proves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration_tests::kafka_broker::KafkaTopics;
use integration_tests::nats_broker::JetStreamTopics;
use integration_tests::rabbitmq_broker::RabbitQueues;
use integration_tests::redis_broker::RedisStreams;
use integration_tests::replay::dead_letters_replayed;
use integration_tests::sqs_broker::SqsQueues;

#[tokio::test(flavor = "multi_thread")]
async fn redis_dead_letters_are_replayed() {
    dead_letters_replayed(&RedisStreams::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_dead_letters_are_replayed() {
    dead_letters_replayed(&KafkaTopics::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_dead_letters_are_replayed() {
    dead_letters_replayed(&JetStreamTopics::new().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs_dead_letters_are_replayed() {
    dead_letters_replayed(&SqsQueues::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_dead_letters_are_replayed() {
    dead_letters_replayed(&RabbitQueues::new()).await;
}
